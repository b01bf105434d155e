"""Meta-kernels (imported as ``xytune.kernels``): fixed-tile primitives for dynamic shapes."""
