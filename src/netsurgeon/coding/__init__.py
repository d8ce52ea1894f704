"""Bytes on disk: bit packing, relative sparse indices and the ``.nsz`` container."""

from .container import NszError as NszError
from .nsz import CompressedFile as CompressedFile
from .nsz import TensorRecord as TensorRecord
from .nsz import read_compressed as read_compressed
from .nsz import save_compressed as save_compressed
