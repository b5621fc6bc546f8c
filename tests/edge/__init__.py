"""Tests of the simulated Fly edge proxy and the local fleet (fly_replay_router/edge)."""
