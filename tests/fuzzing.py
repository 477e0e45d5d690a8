"""Hypothesis strategies shared by the fuzz tests of files hf-graft reads: byte mutations and JSON values."""

from hypothesis import strategies as st


def byte_mutations(header_end: int, size: int):
    """Single edits of a file's bytes, half of them aimed at its first ``header_end`` bytes."""
    positions = st.one_of(st.integers(0, header_end), st.integers(0, size))
    return st.one_of(
        st.tuples(st.just("flip"), positions, st.integers(0, 7)),
        st.tuples(st.just("set"), positions, st.integers(0, 255)),
        st.tuples(st.just("digit"), positions, st.sampled_from(b"0123456789")),
        st.tuples(st.just("truncate"), positions),
        st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), positions, st.integers(1, 8)),
        st.tuples(st.just("extend"), st.binary(min_size=1, max_size=16)),
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4)
    | st.sampled_from(["F32", "I16", "BOOL", "F8_E8M0", "C64", "U64"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


def mutate(data: bytearray, mutation: tuple) -> bytearray:
    """Apply one of :func:`byte_mutations`'s edits to ``data``."""
    kind, *args = mutation
    if kind == "extend":
        return data + args[0]
    position = args[0] % (len(data) + 1)
    if kind == "truncate":
        return data[:position]
    if kind == "insert":
        return data[:position] + args[1] + data[position:]
    if kind == "delete":
        return data[:position] + data[position + args[1]:]
    if position == len(data):
        return data
    data[position] = data[position] ^ (1 << args[1]) if kind == "flip" else args[1]
    return data
