"""vq-core: the abstractions every vq package shares.

Quantizers turn ``[..., head_dim]`` vectors into packed codes (:class:`Quantizer`,
:func:`create`); preconditioners rotate before quantizing; codebooks hold the levels; the
one :class:`CompressedKVCache` stores packed keys and values for an attention layer.
"""

from vq_core.artifacts import Artifact, ArtifactStore, read_artifact
from vq_core.atomic import atomic_write
from vq_core.attention import CacheView, attend
from vq_core.batch_cache import BatchCompressedKVCache
from vq_core.cache import CompressedKVCache
from vq_core.codebook import LloydMax, ScalarCodebook, VectorCodebook, lloyd_max
from vq_core.compressed_attention import (
    CompressedSide,
    compressed_segment,
    register_compressed_attention,
    register_decode_attention,
    registered_compressed_attention,
)
from vq_core.errors import (
    ArtifactError,
    CacheStateError,
    ConfigError,
    DTypeError,
    MissingDependencyError,
    MissingFileError,
    NonFiniteError,
    RangeError,
    ShapeError,
    UnknownMethodError,
    VQError,
    invalid,
    invalid_choice,
)
from vq_core.factory import check_value_method, make_cache
from vq_core.packing import pack, pack_stream, packed_words, unpack, unpack_fields, unpack_stream
from vq_core.preconditioner import (
    Dense,
    Identity,
    Preconditioner,
    RandomizedHadamard,
    RandomOrthogonal,
    make_preconditioner,
    rotate,
)
from vq_core.quantizer import Codes, Quantizer, QuantizerConfig
from vq_core.registry import available, create, from_description, get, register
from vq_core.rotating_cache import CompressedRotatingKVCache
from vq_core.streams import STREAMS, stream_key
from vq_core.validation import FLOAT16_MAX, HeadDims, check_bool, check_int

__version__ = "0.1.0"

__all__ = [
    "FLOAT16_MAX",
    "STREAMS",
    "Artifact",
    "ArtifactError",
    "ArtifactStore",
    "BatchCompressedKVCache",
    "CacheStateError",
    "CacheView",
    "Codes",
    "CompressedKVCache",
    "CompressedRotatingKVCache",
    "CompressedSide",
    "ConfigError",
    "DTypeError",
    "Dense",
    "HeadDims",
    "Identity",
    "LloydMax",
    "MissingDependencyError",
    "MissingFileError",
    "NonFiniteError",
    "Preconditioner",
    "Quantizer",
    "QuantizerConfig",
    "RandomOrthogonal",
    "RandomizedHadamard",
    "RangeError",
    "ScalarCodebook",
    "ShapeError",
    "UnknownMethodError",
    "VQError",
    "VectorCodebook",
    "atomic_write",
    "attend",
    "available",
    "check_bool",
    "check_int",
    "check_value_method",
    "compressed_segment",
    "create",
    "from_description",
    "get",
    "invalid",
    "invalid_choice",
    "lloyd_max",
    "make_cache",
    "make_preconditioner",
    "pack",
    "pack_stream",
    "packed_words",
    "read_artifact",
    "register",
    "register_compressed_attention",
    "register_decode_attention",
    "registered_compressed_attention",
    "rotate",
    "stream_key",
    "unpack",
    "unpack_fields",
    "unpack_stream",
]
