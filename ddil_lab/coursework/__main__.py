"""``python -m ddil_lab.coursework build [--check]`` and
``python -m ddil_lab.coursework grade SUBMISSION.ipynb|FOLDER [...] --out DIR [--timeout S]``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddil_lab.coursework")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the student and instructor versions of the exercises")
    b.add_argument("--out", default=None, help="folder (default notebooks/exercises)")
    b.add_argument("--check", action="store_true",
                   help="write nothing; fail if the built files differ from the sources")
    g = sub.add_parser("grade", help="run and grade submissions (notebooks or folders of them)")
    g.add_argument("paths", nargs="+")
    g.add_argument("--out", default="grades", help="reports go here (default ./grades)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per submission")
    g.add_argument("--no-isolate", action="store_true",
                   help="do not run in a fresh network namespace (offline settings only)")
    a = p.parse_args(argv)
    if a.cmd == "build":
        from .build import build
        paths = build(a.out, check=a.check)
        if a.check:
            print("in sync" if not paths else "out of date (run `python -m ddil_lab.coursework "
                  "build`):\n  " + "\n  ".join(paths))
            return 1 if paths else 0
        print(f"wrote {len(paths)} files")
        return 0
    from .grade import grade_all
    results = grade_all(a.paths, a.out, a.timeout, isolate=False if a.no_isolate else None)
    for r in results:
        print(f"{r['submission']}: {r['exercise']} {r['status']} {r['points']:g}/{r['max_points']}"
              + (f" ({r['error']})" if r["error"] else ""))
    print(f"reports and summary.csv in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
