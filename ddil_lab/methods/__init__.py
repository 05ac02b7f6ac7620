"""Methods: the feedback a student gets on a batch of states (DDIL wraps all three).

A Method never decides where states come from (that is the StateSampler's job); it turns a batch
of states into losses, and tells the sampler through ``spec()`` where it trains and how the
student moves at inference.
"""
from ..validation import check_choice
from .base import Method
from .dmd2 import DMD2
from .lcm import LCM, ConsistencyFn
from .pd import PD

METHODS = {"pd": PD, "lcm": LCM, "dmd2": DMD2}


def make_method(name: str, **kw) -> Method:
    check_choice("method", name, tuple(METHODS))
    return METHODS[name](**kw)


__all__ = ["Method", "PD", "LCM", "ConsistencyFn", "DMD2", "METHODS", "make_method"]
