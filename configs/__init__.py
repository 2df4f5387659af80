"""Configuration presets shipped with the package (`safe_rlhf_v.configs`): YAML and DeepSpeed JSON."""
