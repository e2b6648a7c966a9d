"""Traces: the ``vtd-trace/1`` format (:mod:`.model`), the one replay engine (:mod:`.replay`), recording
(:mod:`.recorder`), batched replay (:mod:`.batch`) and Perfetto timelines (:mod:`.timeline`).  Foreign
formats (QEMU logs, QEMU reference scenarios) become traces in :mod:`vtd_emu.importers`.  The format is
documented in ``docs/trace-format.md``."""
