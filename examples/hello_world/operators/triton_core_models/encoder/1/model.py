"""Hello-world encoder as a Triton python-backend model.

output = invert(tile(input, input_copies)), where invert is bitwise NOT (~x) for integer and
bool tensors and negation (-x) for floating point ones; ~~x == x, so the decoder undoes it
exactly. `delay` (seconds per input element) simulates work. Both come from config.pbtxt
`parameters` (strings), which tdist's graph YAML overrides per deployment.
"""

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def invert(x):
    if x.dtype.kind in ("i", "u", "b"):
        return np.invert(x)
    return -x


def _param(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_copies = int(_param(config, "input_copies", "1"))
        self.delay = float(_param(config, "delay", "0"))

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
            if self.delay > 0:
                time.sleep(self.delay * x.size)
            y = invert(np.tile(x, self.input_copies))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("output", y)]))
        return responses
