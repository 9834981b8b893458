"""Rewrite the lines between two marker comments of README.md, so the README quotes a bench's latest results."""

from textual_inversion_core.atomic import atomic_path


def replace_block(readme, begin, end, lines, tag):
    """Put lines between the begin and end markers of readme (atomically); say so and do nothing without them."""
    with open(readme) as f:
        text = f.read()
    if begin not in text or end not in text:
        print(f"[{tag}] README.md has no {begin} ... {end} block; not updated", flush=True)
        return
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with atomic_path(readme) as tmp:
        with open(tmp, "w") as f:
            f.write(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
