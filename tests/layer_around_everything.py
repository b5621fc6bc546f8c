"""An app with the affinity layer around every path (``AffinityMiddleware(app)``, as a user may wrap a
whole app): a request the framework would not route still meets the layer. The inner app is the
recording stand-in of ``tests.forward_owner``.
"""

from __future__ import annotations

from fly_replay_router import AffinityMiddleware, load_settings
from tests import forward_owner

app = AffinityMiddleware(forward_owner.app, settings=load_settings())
