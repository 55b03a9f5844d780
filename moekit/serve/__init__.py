"""An OpenAI-compatible server with continuous batching (``moekit serve``).

:mod:`moekit.serve.engine` holds the batching loop (plain PyTorch); :mod:`moekit.serve.app` the HTTP API
and :mod:`moekit.serve.server` the launcher, which need the ``serve`` extra (``pip install
'moekit[serve]'``: starlette and uvicorn). Nothing is imported here, so ``moekit --help`` stays light.
"""
