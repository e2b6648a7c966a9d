"""Register and structure layouts loaded from ``specs/*.yaml`` ("specs are data").

``specs()`` returns the default, validated and compiled specs (loaded once); ``load_specs(dir)`` loads
another directory.  See ``docs/specs.md`` for the YAML format.
"""

from __future__ import annotations

from vtd_emu.spec.loader import FaultSpec, Field, Layout, Register, Specs, load_specs, specs, specs_dir

__all__ = ["FaultSpec", "Field", "Layout", "Register", "Specs", "load_specs", "specs", "specs_dir"]
