"""Import QEMU ``-trace 'vtd_*'`` logs (log backend) into ``vtd-trace/1``.

:mod:`.parse` reads the lines (any size, plain or ``.zst``, streamed), :mod:`.reconstruct` rebuilds the
guest memory each event needs from the log and a RAM snapshot, :mod:`.convert` turns the events into a
trace (:func:`import_log` in memory, :func:`import_log_to` streamed into JSON Lines).

What becomes what:

* ``vtd_reg_write`` → ``mmio_write`` (same offset, size, value); ``vtd_reg_read`` → ``mmio_read``.
* ``vtd_inv_desc`` (which prints the whole 128-bit descriptor) → the descriptor is written into the queue
  memory, at the head QEMU was fetching from, *before* the register write that made QEMU fetch it (the
  queue's contents are not otherwise in the log).  ``vtd_inv_desc_*`` details become the note of that
  register write.  Descriptor types QEMU 7.2 does not trace (PASID-cache, PASID-IOTLB) cannot be
  reconstructed; replay then needs them in the RAM image.
* Root / translation / queue / interrupt-remapping setup (``vtd_reg_dmar_root``, ``vtd_dmar_enable``,
  ``vtd_inv_qi_enable``, ``vtd_ir_enable``) → register expectations (RTADDR, GSTS bits) on the register
  write that caused them; ``vtd_reg_ir_root`` → a note.
* ``vtd_dmar_translate`` → a 4-byte ``dma`` expecting the output address.  With the
  ``vtd_iotlb_page_update`` (QEMU walked) or ``vtd_iotlb_page_hit`` (QEMU's IOTLB answered) before it, the
  DMA uses the exact address that line prints, expects ``walks`` 1 or 0 (replay under ``qemu-7.2`` must
  walk or hit where QEMU did), reads if the leaf permits reads (else writes zeros), and a walk is preceded
  by the ``mem_write``\\ s that make memory hold the leaf QEMU read (:mod:`.reconstruct`).
  ``vtd_translate_pt`` likewise (identity); ``vtd_dmar_fault`` → a 4-byte ``dma`` of the faulting address
  in the logged direction expecting that fault (QEMU's 4-byte retries of it fold into one DMA).
* ``vtd_ir_remap_msi_req`` … ``vtd_ir_remap_msi`` → an ``msi`` event expecting the remapped address and
  data; the ``vtd_ir_irte_get`` between them is written into the interrupt-remapping table first and
  gives the requester id (QEMU does not log it; the IRTE's source validation says which it accepts).  A
  request answered by ``vtd_frr_new`` expects that IR fault (and the record).
* ``vtd_iotlb_cc_update``/``_hit`` → the context entry the reconstruction writes where memory differs.
* ``vtd_frr_new`` after a DMA → expectations of the fault recording register (with F set, which QEMU
  does right after printing).
* Everything else QEMU prints about its internals is informational and counted.
"""

from .convert import import_log, import_log_to
from .parse import EVENTS, LogEvent, LogSummary, iter_log, open_log, parse_log
from .reconstruct import Reconstructor

__all__ = ["EVENTS", "LogEvent", "LogSummary", "Reconstructor", "import_log", "import_log_to", "iter_log", "open_log",
           "parse_log"]
