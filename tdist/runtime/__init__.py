"""What runs on compute nodes. Never imports cli/spec/plan/launch.

The public API for operator authors: Operator, Request, Response, OperatorContext, RemoteOperator,
and RequestClient (to call a deployment from a plain script). RequestClient is imported on first
use, so `import tdist.runtime` does not load the NATS client.
"""

from typing import Any

from tdist.runtime.operator import Operator, OperatorContext, RemoteOperator, Request, Response

__all__ = ["Operator", "OperatorContext", "RemoteOperator", "Request", "RequestClient", "Response"]


def __getattr__(name: str) -> Any:
    if name == "RequestClient":
        from tdist.runtime.planes.request import RequestClient

        return RequestClient
    raise AttributeError(f"module 'tdist.runtime' has no attribute {name!r}")
