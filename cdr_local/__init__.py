"""cdr-local: offline preference annotation with a customized density ratio.

reward(x, y) = log p_strong(y | x) - log p_weak(y | x), computed on local GGUF
models through llama.cpp.  Nothing optional is imported here, so that the CLI
starts fast; the engine imports llama_cpp lazily.
"""

__version__ = "0.1.0"
