"""GPU kernels (Triton). Everything here has a plain-torch reference path elsewhere in ptqlab."""
