"""What runs on compute nodes. Never imports cli/spec/plan/launch.

The public API for operator authors: Operator, Request, Response, OperatorContext, RemoteOperator.
"""

from tdist.runtime.operator import Operator, OperatorContext, RemoteOperator, Request, Response

__all__ = ["Operator", "OperatorContext", "RemoteOperator", "Request", "Response"]
