"""Validity check cost against file size: a 4 GiB checkpoint against a 4 MiB one.

Both files are real torch.save archives of one float32 tensor: ones in the small file, zeros in
the large one. A child process runs torch.save into a writer that turns each all-zero MiB into a
seek, so the large file is sparse: its size is 4 GiB while only its headers, data.pkl and the end
records take disk blocks. The small file is written in full. Each
file is checked with watcher.validity.check_file, which must return valid; the small and large
checks alternate. For comparison, the same files are opened with the standard zipfile module,
which reads the central directory too but checks neither torch's records nor data.pkl.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import benchlib as lib

_SPARSE_SAVE_CODE = """
import os, sys, torch
ZERO = bytes(1 << 20)

class SparseWriter:
    def __init__(self, path):
        self.file = open(path, "wb")

    def write(self, data):
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), 1 << 20):
            chunk = view[offset : offset + (1 << 20)]
            if chunk == ZERO[: len(chunk)]:
                self.file.seek(len(chunk), os.SEEK_CUR)
            else:
                self.file.write(chunk)
        return len(view)

    def flush(self):
        self.file.flush()

writer = SparseWriter(sys.argv[1])
tensor = torch.full((int(sys.argv[2]) // 4,), float(sys.argv[3]), dtype=torch.float32)
torch.save({"weight": tensor}, writer)
writer.file.truncate(writer.file.tell())
writer.file.close()
"""


def make_checkpoint(path: Path, tensor_bytes: int, fill: float) -> dict[str, int]:
    """Write a torch.save file of one tensor filled with `fill`; return its size and blocks.

    With fill 0 the tensor bytes become holes, so the file is sparse.
    """
    subprocess.run(
        [lib.PYTHON, "-c", _SPARSE_SAVE_CODE, str(path), str(tensor_bytes), str(fill)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    info = os.stat(path)
    return {"size": info.st_size, "allocated": info.st_blocks * 512}


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    from watcher.validity import check_file

    small_bytes = 4 * 2**20
    large_bytes = 64 * 2**20 if args.quick else 4 * 2**30
    rounds = 20 if args.quick else 500
    lib.require_free_disk(args.tmp, 64 * 2**20)
    with lib.bench_folder(args.tmp, "validity") as folder:
        machine = lib.machine_info(folder)
        files = {
            f"check_file, {small_bytes >> 20} MiB": folder / "small.pt",
            f"check_file, {large_bytes >> 20} MiB": folder / "large.pt",
        }
        sizes = {}
        verdicts = {}
        for (name, path), tensor_bytes, fill in zip(
            files.items(), (small_bytes, large_bytes), (1.0, 0.0)
        ):
            sizes[name] = make_checkpoint(path, tensor_bytes, fill)
            verdicts[name] = check_file(None, str(path))

        def timed_check(path: Path):
            def run() -> float:
                started = time.perf_counter()
                check_file(None, str(path))
                return time.perf_counter() - started

            return run

        def timed_zipfile(path: Path):
            def run() -> float:
                started = time.perf_counter()
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()
                return time.perf_counter() - started

            return run

        variants = {name: timed_check(path) for name, path in files.items()}
        for name, path in files.items():
            variants[name.replace("check_file", "zipfile open")] = timed_zipfile(path)
        samples = lib.interleave(variants, rounds)

    summaries = {name: lib.summarize(values) for name, values in samples.items()}
    small_name, large_name = files
    size_ratio = lib.ratio(summaries[large_name], summaries[small_name])
    all_valid = all(verdict.valid for verdict in verdicts.values())
    targets = {
        "both files valid": all_valid,
        "large-file check within 2x of the small-file check": size_ratio <= 2.0,
    }
    results = {
        "machine": machine,
        "quick": args.quick,
        "rounds": rounds,
        "sizes": sizes,
        "verdicts": {name: verdict.reason for name, verdict in verdicts.items()},
        "summaries": summaries,
        "ratio_large_to_small": size_ratio,
        "targets": targets,
    }
    size_lines = [
        f"- {name}: {info['size']} bytes, {info['allocated']} bytes allocated on disk, "
        f"verdict: {verdicts[name].reason}"
        for name, info in sizes.items()
    ]
    lines = [
        "## Validity check cost against file size",
        "",
        *size_lines,
        "",
        f"{rounds} checks per variant, interleaved, warm page cache.",
        "",
        lib.table_ms(summaries, small_name),
        "",
    ]
    lines += [f"- {name}: {'met' if met else 'MISSED'}" for name, met in targets.items()]
    lib.write_results("validity_size", results, "\n".join(lines))
    return 0 if all_valid else 1


if __name__ == "__main__":
    sys.exit(main())
