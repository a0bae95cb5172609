"""Graph passes, one per file. Each registers itself with ``@register_pass`` on import."""
from ..pipeline import PASS_REGISTRY, Pass, PassResult, graph_pass, register_pass

__all__ = ["PASS_REGISTRY", "Pass", "PassResult", "graph_pass", "register_pass"]
from .cache import StepCache  # noqa: E402

__all__ += ["StepCache"]
from .quantize import Quantize  # noqa: E402

__all__ += ["Quantize"]
from ..calibration.select import (AgglomerativeCalibration, DBSCANCalibration, KMeansCalibration,  # noqa: E402
                                  RandomCalibration, TAPCalibration, UniformCalibration)

__all__ += ["UniformCalibration", "RandomCalibration", "KMeansCalibration", "DBSCANCalibration",
            "AgglomerativeCalibration", "TAPCalibration"]
from .vc import VarianceCompensation  # noqa: E402

__all__ += ["VarianceCompensation"]
