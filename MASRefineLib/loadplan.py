"""What a viewer loads from a finished run: moved to :mod:`MASRefineLib.protocol.loadplan` (standard library only);
this name stays for scripts."""
from .protocol.loadplan import LOADABLE, atlas_ids, load_plan, qa_rows, run_name  # noqa: F401
