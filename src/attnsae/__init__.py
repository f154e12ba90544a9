"""attnsae: sparse autoencoders on attention-layer outputs (hook_z), trained, evaluated and reproduced."""
