"""Tests of the simulated Fly edge proxy and the local fleet (app/edge)."""
