"""Finding the training machine's paths in output files (both trainers' tests use it)."""

import os


def paths_of_this_machine(*folders):
    """The absolute forms of folders (model, data, output, the test session's temporary root ...) and the home
    directory: what a shared output file must not contain."""
    found = {os.path.abspath(str(f)).rstrip(os.sep) for f in folders if f}
    home = os.path.expanduser("~").rstrip(os.sep)
    if len(home) > 1:  # a home of "/" would match every path
        found.add(home)
    return sorted(found)


def scan(folder, needles, skip=()):
    """(files scanned, {file: [needles found]}) over every file below folder, read as bytes (UTF-8 and UTF-16);
    file names are relative, with '/'; files starting with a prefix in skip are left out."""
    scanned, hits = [], {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel.startswith(tuple(skip)):
                continue
            scanned.append(rel)
            with open(path, "rb") as f:
                data = f.read()
            found = [n for n in needles if n.encode() in data or n.encode("utf-16-le") in data]
            if found:
                hits[rel] = found
    return sorted(scanned), hits
