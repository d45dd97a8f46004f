"""temlib: machine learning for transmission electron microscopy.

Modules follow the pipeline, one step each (data flows one way):
``crystal`` -> ``simulate`` -> ``synth`` / ``io`` -> descriptors, matching,
models -> maps and tracks -> ``reports``.
"""

from . import _runtime

_runtime.apply()

__version__ = "0.1.0"
