"""LLM engines as operators (vLLM, TensorRT-LLM) and the pieces they share.

Deliberately empty: vLLM's engine processes import `tdist.operators.llm.nixl_cpu` by module
path (`kv_connector_module_path`), and importing this package must not pull in the engines.
"""
