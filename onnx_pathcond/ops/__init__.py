"""One rule per ONNX op family. Importing this package registers them all.

To support a new op, write a rule class (see `base.OpRule`: `analyse` and `path`) in one of
these modules, or a new one imported below, and decorate it with `@register`. Ops without a
rule are barriers. docs/adding-an-op.md walks through an example.
"""

from . import (batchnorm, clip, conv, einsum, elementwise, linear, movement, pools, resize,  # noqa: F401  (registration)
               sequence)
from .base import OpRule, register, rule_for, supported_op_types

__all__ = ["OpRule", "register", "rule_for", "supported_op_types"]
