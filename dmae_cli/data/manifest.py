"""The shard manifest that `dmae shard` writes and the `webdataset` dataset reads.

A manifest is a data file: whoever wrote it need not be whoever runs dmae on it. So the shard
names it lists are only ever plain file names inside the manifest's own directory, opened as
files: never a `pipe:` command, a URL, an absolute path, a `..` or a symlink leading out of the
directory. Commands and URLs stay possible where the user types them (a recipe, `--set`).
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_SUFFIX = "-manifest.json"


def bad_shard_name(name: object) -> str | None:
    """Why `name` is not a plain file name a manifest may list; None when it is one."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if name in (".", "..") or any(sep in name for sep in ("/", "\\")):
        return "a path, not a file name"
    # No ':' at all: it rules out every spelling of `pipe:`, `file:` or a URL scheme at once,
    # and no shard writer puts one in a name.
    if ":" in name:
        return "a URL or command, not a file name"
    if name != name.strip() or not name.isprintable():
        return "blank or control characters at its ends or inside"
    return None


def listed_shard(manifest: Path, name: object) -> Path:
    """The absolute path of shard `name` as `manifest` lists it.

    Raises ValueError naming the problem when `name` is not a plain file name, or when the
    file (through a symlink) lies outside the manifest's directory.
    """
    problem = bad_shard_name(name)
    if problem is not None:
        raise ValueError(f"bad shard name {name!r}: {problem}")
    assert isinstance(name, str)
    directory = manifest.expanduser().absolute().parent.resolve()
    path = directory / name
    if not path.resolve().is_relative_to(directory):
        raise ValueError(f"shard {name!r} is a link to a file outside {str(directory)!r}")
    return path
