"""Bytes on disk: bit packing, relative sparse indices, Huffman codes, hashing maps, the ``.nsz`` container and
its header schema. The ``.nsz`` model file itself is ``netsurgeon.nsz`` (it writes each tensor through its
storage form, ``netsurgeon.forms``)."""

from .container import NszError as NszError
