from trainer.config.loader import apply_override, config_to_dict, config_to_toml, load_config, preset_names
from trainer.config.schema import Config, ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "apply_override",
    "config_to_dict",
    "config_to_toml",
    "load_config",
    "preset_names",
]
