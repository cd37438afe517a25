"""Thin Python client for vis-service (see README.md).

    from vis_client import Client, Target
    with Client("127.0.0.1:50051") as c:
        m = c.model("resnet18")
        acts = m.activations(["cat.jpg"], ["conv1"])
"""
from .attribution import Attribution, DeconvnetProjections
from .client import (PRESETS, Client, GradientResult, Inspection, Model, NodeInfo, ReceptiveField, Target,
                     TensorSpec)
from .errors import (AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                     ResourceExhausted, Unavailable, Unimplemented, VisError)
from .localization import Cam, Occlusion
from .optimization import InversionResult, LayerInversion, Objective, OptimizationResult, Snapshot
from .stream import Result, collect
from .tensors import ChunkAssembler, CorruptStream, from_proto, to_proto

__version__ = "0.1.0"

__all__ = ["Client", "Model", "Attribution", "DeconvnetProjections", "Cam", "Occlusion", "Objective", "OptimizationResult", "InversionResult", "LayerInversion", "Snapshot", "TensorSpec", "NodeInfo", "ReceptiveField", "Inspection", "GradientResult", "Target",
           "PRESETS", "Result", "collect", "VisError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
           "ResourceExhausted", "Unimplemented", "Unavailable", "DeadlineExceeded", "Cancelled", "ChunkAssembler",
           "CorruptStream", "to_proto", "from_proto", "__version__"]
