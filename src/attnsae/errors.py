"""The one exception type that the CLI turns into a one-line message and a non-zero exit, and the few words
of a library's failure that such a message quotes."""


class UserError(Exception):
    """Bad input: a wrong value, a missing file, an unknown key. The message names the value and what is allowed."""


def innermost_cause(err: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause of ``err``, in a few words: libraries (MLflow, huggingface_hub)
    wrap 'connection refused', 'database or disk is full' or an HTTP status in pages of context."""
    seen = [err]
    while (cause := seen[-1].__cause__ or seen[-1].__context__) is not None and cause not in seen:
        seen.append(cause)
    inner = seen[-1]
    text = (inner.strerror if isinstance(inner, OSError) and inner.strerror else str(inner)) or type(inner).__name__
    line = text.strip().splitlines()[0] if text.strip() else type(inner).__name__
    return (line[:1].lower() + line[1:])[:limit]
