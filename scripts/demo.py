"""`make demo`: check the stack, then run notebooks/quickstart.ipynb headless and print it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebooks import NOTEBOOKS, execute, scratch_copy  # noqa: E402

from mino_jupyter.doctor import run_checks  # noqa: E402


def show(nb) -> None:
    number = 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            print("\n" + "\n".join("# " + line for line in cell.source.splitlines()))
            continue
        number += 1
        print(f"\nIn [{number}]:")
        print("\n".join("    " + line for line in cell.source.splitlines()))
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                prefix = "" if output.name == "stdout" else "[stderr] "
                sys.stdout.write("".join(prefix + line + "\n" for line in output.text.splitlines()))
            elif output.output_type == "error":
                print(f"{output.ename}: {output.evalue}")
            elif "text/plain" in output.get("data", {}):
                print(output["data"]["text/plain"])


def main() -> int:
    print("== mino-jupyter doctor")
    if not run_checks(lambda c: print(c.render(), flush=True)):
        return 1
    print("\n== notebooks/quickstart.ipynb, executed headless")
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    work = scratch_copy()
    try:
        execute(nb, work)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    show(nb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
