"""Importers: foreign formats turned into ``vtd-trace/1`` (:mod:`vtd_emu.trace.model`) when loading, so that
one replay engine serves everything.

* :mod:`.qemu_log`: QEMU ``-trace 'vtd_*'`` logs (``vtd-emu import-qemu``);
* :mod:`.qemu_scenario`: QEMU reference scenarios (``vtd-oracle-scenario/1``, ``shared/qemu-oracle``),
  replayed with QEMU's recorded answers as expectations.
"""
