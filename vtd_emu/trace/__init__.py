"""Traces: the ``vtd-trace/1`` format (:mod:`.model`), replay (:mod:`.replay`), recording (:mod:`.recorder`),
batched replay (:mod:`.batch`), QEMU log import (:mod:`.qemu_log`), Perfetto timelines (:mod:`.timeline`) and
QEMU reference scenarios (:mod:`.oracle`).  The format is documented in ``docs/trace-format.md``."""
