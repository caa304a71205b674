from .base import Plan, Policy, full_plan
from .deepcache import DeepCacheConfig, DeepCachePolicy
from .fora import ForaConfig, ForaPolicy

__all__ = ["Plan", "Policy", "full_plan", "DeepCacheConfig", "DeepCachePolicy", "ForaConfig", "ForaPolicy"]
