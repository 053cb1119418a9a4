"""gpubox's test bench: the sandbox host, the local Hugging Face server and the test-model writers.

Nothing in the product package (`provision`) imports from here; the sandbox and demo tasks load it
lazily, and the tests use it directly. It is not part of the installed wheel's product code.
"""
