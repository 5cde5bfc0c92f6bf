from .backbone import Sapiens2Backbone
from .config import ARCH_ZOO, ArchConfig, get_arch
from .layers import native_state_dict

__all__ = ["ARCH_ZOO", "ArchConfig", "Sapiens2Backbone", "get_arch", "native_state_dict"]
