#!/usr/bin/env python3
"""Compare two GGUF files (or dump one) with the PyPI `gguf` reader.

    compare_gguf.py A.gguf B.gguf [--ignore-naming] [--max-diffs N] [--dequant]
    compare_gguf.py --dump A.gguf [--full]

Compared: the header (version, counts), every KV in order with its value type(s) and raw value bytes, tensor
infos (names in order, ggml types, shapes), every tensor's data bytes, and the data-section layout (start of the
data section, each tensor's relative offset, alignment, padding bytes, file size). One line per difference (the
first --max-diffs), then a summary; exit 0 if identical, 1 if not, 2 on usage/read errors.

--ignore-naming skips the KVs that convert_hf_to_gguf.py fills from naming heuristics (the folder name, a model
card, README front matter) rather than from config/tokenizer files: gguf-py `Metadata.set_gguf_meta_model`
writes them (NAMING_KEYS / NAMING_PREFIXES below). general.sampling.* keys are NOT skipped: they come from
generation_config.json and must be reproduced. Skipped keys present in only one file are still reported, as
notes that do not count as differences. KV order is compared on the remaining keys.
"""
import argparse
import mmap
import sys

import numpy as np

try:
    import gguf
    from gguf import GGUFReader, GGUFValueType
except ImportError:  # pragma: no cover
    print("compare_gguf.py: the `gguf` package is required (pip install gguf==0.19.0)", file=sys.stderr)
    sys.exit(2)

# Written by gguf-py's Metadata.set_gguf_meta_model from heuristics (directory name, model card, README):
NAMING_KEYS = {
    "general.name",          # Metadata.name: model card, else the directory name ("Smollm2", "Small", ...)
    "general.author",        # model card
    "general.version",       # parsed from the name ("v0.1"), or model card
    "general.organization",  # parsed from the name / HF repo id
    "general.finetune",      # parsed from the name ("Instruct", "Chat", ...)
    "general.basename",      # parsed from the name
    "general.description",   # model card
    "general.quantized_by",  # model card
    "general.size_label",    # computed from parameter count / expert count ("135M", "62M", "8x7B")
    "general.license",       # model card
    "general.license.name",
    "general.license.link",
    "general.url",           # model card / repo
    "general.doi",
    "general.uuid",
    "general.repo_url",
    "general.tags",          # model card
    "general.languages",     # model card
    "general.dataset.count",
    "general.base_model.count",
}
NAMING_PREFIXES = (
    "general.source.",       # url / doi / uuid / repo_url of the conversion source (model card)
    "general.base_model.",   # general.base_model.{id}.name/author/version/organization/description/url/...
    "general.dataset.",      # general.dataset.{id}.*
)


def is_naming_key(key: str) -> bool:
    return key in NAMING_KEYS or key.startswith(NAMING_PREFIXES)


def type_str(field) -> str:
    t = field.types
    if not t:
        return "?"
    if t[0] == GGUFValueType.ARRAY:
        n = len(field.data)
        return f"ARRAY[{t[-1].name}]({n})"
    return t[0].name


def value_repr(field, full: bool = False, limit: int = 100) -> str:
    try:
        v = field.contents()
    except Exception as e:  # noqa: BLE001
        return f"<unreadable: {e}>"
    if isinstance(v, list):
        if full:
            return repr(v)
        head = ", ".join(repr(x) for x in v[:4])
        return f"[{head}{', ...' if len(v) > 4 else ''}]"
    r = repr(v)
    if not full and len(r) > limit:
        r = r[:limit] + f"... ({len(v) if isinstance(v, str) else len(r)} chars)"
    return r


def _plain_mmap(path, mode="r", **_kw):
    """np.memmap stand-in returning a plain ndarray over an mmap: GGUFReader slices the file into ~10^5 small
    views (one per token string) and np.memmap's per-view bookkeeping makes that ~3x slower."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(m, dtype=np.uint8)


class GGUF:
    def __init__(self, path: str):
        self.path = path
        import gguf.gguf_reader as gr
        orig = gr.np.memmap
        gr.np.memmap = _plain_mmap
        try:
            self.r = GGUFReader(path, "r")
        finally:
            gr.np.memmap = orig
        self.mm = self.r.data  # uint8 array over the whole file (mmap)
        fields = list(self.r.fields.values())
        self.header = {f.name: f.contents() for f in fields if f.name.startswith("GGUF.")}
        self.kvs = [f for f in fields if not f.name.startswith("GGUF.")]
        self.kv_by_name = {f.name: f for f in self.kvs}
        self.tensors = list(self.r.tensors)
        self.file_size = int(self.mm.shape[0])

    def field_bytes(self, f) -> bytes:
        n = sum(int(p.nbytes) for p in f.parts)
        return self.mm[f.offset:f.offset + n].tobytes()

    def tensor_bytes(self, t):
        return self.mm[t.data_offset:t.data_offset + t.n_bytes]

    def alignment(self) -> int:
        return int(getattr(self.r, "alignment", 32))


def dump(path: str, full: bool) -> int:
    g = GGUF(path)
    print(f"file: {path} ({g.file_size} bytes)")
    print(f"header: version {g.header.get('GGUF.version')}, tensors {g.header.get('GGUF.tensor_count')}, "
          f"kv {g.header.get('GGUF.kv_count')}, alignment {g.alignment()}, data section at {g.r.data_offset}")
    print(f"kv ({len(g.kvs)}, in file order):")
    for i, f in enumerate(g.kvs):
        tag = "  [naming]" if is_naming_key(f.name) else ""
        print(f"  {i:3d} {f.name:<45} {type_str(f):<22} {value_repr(f, full)}{tag}")
    print(f"tensors ({len(g.tensors)}, in file order): name, type, shape (ne0, ne1, ...), offset in data section, bytes")
    counts = {}
    for i, t in enumerate(g.tensors):
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        print(f"  {i:4d} {t.name:<32} {t.tensor_type.name:<6} {list(map(int, t.shape))} "
              f"{t.data_offset - g.r.data_offset} {t.n_bytes}")
    print("type counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0


def compare(pa: str, pb: str, ignore_naming: bool, max_diffs: int, dequant: bool) -> int:
    a, b = GGUF(pa), GGUF(pb)
    diffs = []
    notes = []

    def diff(msg):
        diffs.append(msg)

    # header
    for k in ("GGUF.version",):
        if a.header.get(k) != b.header.get(k):
            diff(f"header: {k} {a.header.get(k)} != {b.header.get(k)}")

    # KVs
    def keep(f):
        return not (ignore_naming and is_naming_key(f.name))

    ka = [f.name for f in a.kvs if keep(f)]
    kb = [f.name for f in b.kvs if keep(f)]
    skipped = sorted({f.name for f in a.kvs + b.kvs if not keep(f)})
    for name in skipped:
        fa, fb = a.kv_by_name.get(name), b.kv_by_name.get(name)
        if fa is None or fb is None:
            which = "A" if fb is None else "B"
            f = fa or fb
            notes.append(f"note: naming key only in {which} (skipped): {name} = {value_repr(f)}")
        elif a.field_bytes(fa) != b.field_bytes(fb):
            notes.append(f"note: naming key differs (skipped): {name}: {value_repr(fa)} vs {value_repr(fb)}")
    sa, sb = set(ka), set(kb)
    for name in ka:
        if name not in sb:
            diff(f"kv only in A: {name} {type_str(a.kv_by_name[name])} = {value_repr(a.kv_by_name[name])}")
    for name in kb:
        if name not in sa:
            diff(f"kv only in B: {name} {type_str(b.kv_by_name[name])} = {value_repr(b.kv_by_name[name])}")
    common_a = [k for k in ka if k in sb]
    common_b = [k for k in kb if k in sa]
    kv_order_same = common_a == common_b
    if not kv_order_same:
        pos = next(i for i, (x, y) in enumerate(zip(common_a, common_b)) if x != y)
        diff(f"kv order differs at common key #{pos}: A has {common_a[pos]}, B has {common_b[pos]} "
             f"(A: ...{common_a[max(0, pos - 1):pos + 3]}, B: ...{common_b[max(0, pos - 1):pos + 3]})")
    kv_equal = 0
    for name in common_a:
        fa, fb = a.kv_by_name[name], b.kv_by_name[name]
        ta, tb = type_str(fa), type_str(fb)
        if [t.name for t in fa.types] != [t.name for t in fb.types]:
            diff(f"kv {name}: type {ta} != {tb} (values {value_repr(fa)} vs {value_repr(fb)})")
        elif a.field_bytes(fa) != b.field_bytes(fb):
            extra = ""
            if fa.types[0] == GGUFValueType.ARRAY:
                va, vb = fa.contents(), fb.contents()
                if len(va) != len(vb):
                    extra = f" (lengths {len(va)} vs {len(vb)})"
                else:
                    i = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), None)
                    extra = f" (first difference at [{i}]: {va[i]!r} vs {vb[i]!r})" if i is not None else ""
                diff(f"kv {name} ({ta}): values differ{extra}")
            else:
                diff(f"kv {name} ({ta}): {value_repr(fa)} != {value_repr(fb)}")
        else:
            kv_equal += 1

    # tensor infos and data
    na, nb = [t.name for t in a.tensors], [t.name for t in b.tensors]
    ta_by, tb_by = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    for n in na:
        if n not in tb_by:
            diff(f"tensor only in A: {n}")
    for n in nb:
        if n not in ta_by:
            diff(f"tensor only in B: {n}")
    common = [n for n in na if n in tb_by]
    order_same = common == [n for n in nb if n in ta_by] and na == nb
    if not order_same and [n for n in nb if n in ta_by] != common:
        cb = [n for n in nb if n in ta_by]
        pos = next(i for i, (x, y) in enumerate(zip(common, cb)) if x != y)
        diff(f"tensor order differs at #{pos}: A has {common[pos]}, B has {cb[pos]}")
    same_type = same_shape = same_bytes = 0
    n_dequant = 0
    for n in common:
        x, y = ta_by[n], tb_by[n]
        tx, ty = x.tensor_type.name, y.tensor_type.name
        sx, sy = list(map(int, x.shape)), list(map(int, y.shape))
        ok_type, ok_shape = tx == ty, sx == sy
        same_type += ok_type
        same_shape += ok_shape
        if not ok_type:
            diff(f"tensor {n}: type {tx} != {ty}")
        if not ok_shape:
            diff(f"tensor {n}: shape {sx} != {sy}")
        if not (ok_type and ok_shape):
            continue
        bx, by = a.tensor_bytes(x), b.tensor_bytes(y)
        if bx.shape == by.shape and np.array_equal(bx, by):
            same_bytes += 1
            continue
        msg = f"tensor {n} ({tx} {sx}): data differs"
        if bx.shape == by.shape:
            ne = bx != by
            first = int(np.argmax(ne))
            blk_elems, blk_bytes = gguf.GGML_QUANT_SIZES[x.tensor_type]
            nblk = bx.shape[0] // blk_bytes
            bad_blocks = int(ne.reshape(nblk, blk_bytes).any(axis=1).sum()) if nblk * blk_bytes == bx.shape[0] else -1
            msg += f": {int(ne.sum())} bytes, {bad_blocks}/{nblk} blocks; first at byte {first}"
            if dequant and n_dequant < max_diffs:
                n_dequant += 1
                try:
                    from gguf.quants import dequantize
                    dx = dequantize(np.asarray(x.data), x.tensor_type).astype(np.float64)
                    dy = dequantize(np.asarray(y.data), y.tensor_type).astype(np.float64)
                    msg += f"; dequantized max |A-B| = {np.max(np.abs(dx - dy)):.3g}"
                except Exception as e:  # noqa: BLE001
                    msg += f"; (dequantize failed: {e})"
        else:
            msg += f": sizes {bx.shape[0]} vs {by.shape[0]}"
        diff(msg)

    # data-section layout
    layout_same = True
    if a.alignment() != b.alignment():
        layout_same = False
        diff(f"layout: alignment {a.alignment()} != {b.alignment()}")
    if a.r.data_offset != b.r.data_offset and not notes:  # skipped naming KVs of other sizes move it
        layout_same = False
        diff(f"layout: data section starts at {a.r.data_offset} != {b.r.data_offset}")
    for n in common:
        ox, oy = ta_by[n].data_offset - a.r.data_offset, tb_by[n].data_offset - b.r.data_offset
        if ox != oy:
            layout_same = False
            diff(f"layout: tensor {n} at data offset {ox} != {oy}")
            break
    for g, tag in ((a, "A"), (b, "B")):
        ts = sorted(g.tensors, key=lambda t: t.data_offset)
        end = g.r.data_offset
        bad = []
        for t in ts:
            if t.data_offset < end:
                bad.append(f"{t.name} overlaps")
            elif t.data_offset > end and g.mm[end:t.data_offset].any():
                bad.append(f"non-zero padding before {t.name}")
            if (t.data_offset - g.r.data_offset) % g.alignment():
                bad.append(f"{t.name} misaligned")
            end = t.data_offset + t.n_bytes
        tail = g.file_size - end
        if tail < 0 or tail >= g.alignment() or g.mm[end:].any():
            bad.append(f"{tail} trailing bytes after the last tensor")
        for m in bad[:3]:
            layout_same = False
            diff(f"layout {tag}: {m}")
    size_a, size_b = a.file_size - a.r.data_offset, b.file_size - b.r.data_offset
    if size_a != size_b:
        layout_same = False
        diff(f"layout: data section size {size_a} != {size_b}")

    identical_file = a.file_size == b.file_size and np.array_equal(a.mm, b.mm)

    for m in notes:
        print(m)
    for m in diffs[:max_diffs]:
        print(m)
    if len(diffs) > max_diffs:
        print(f"... {len(diffs) - max_diffs} more differences")
    n_skipped = len(skipped)
    kv_total = max(len(ka), len(kb))
    print(f"tensors: {same_bytes}/{len(na)} identical bytes, types {same_type}/{len(na)}, shapes {same_shape}/{len(na)}, "
          f"order {'same' if order_same else 'DIFFERENT'}"
          + (f" (B has {len(nb)})" if len(nb) != len(na) else "")
          + f"; kv: {kv_equal}/{kv_total} equal, order {'same' if kv_order_same else 'DIFFERENT'}"
          + (f" ({n_skipped} naming keys skipped: {', '.join(skipped)})" if ignore_naming else "")
          + f"; layout: {'same' if layout_same else 'DIFFERENT'}"
          + f"; whole file {'byte-identical' if identical_file else 'not byte-identical'}")
    return 0 if not diffs else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--ignore-naming", action="store_true", help="skip the converter's naming-heuristic KVs")
    ap.add_argument("--max-diffs", type=int, default=20)
    ap.add_argument("--dequant", action="store_true", help="report max |A-B| of dequantized differing tensors")
    ap.add_argument("--dump", action="store_true", help="print one file's KVs and tensors")
    ap.add_argument("--full", action="store_true", help="with --dump: print values in full")
    a = ap.parse_args()
    try:
        if a.dump:
            if len(a.files) != 1:
                ap.error("--dump takes one file")
            return dump(a.files[0], a.full)
        if len(a.files) != 2:
            ap.error("need two files")
        return compare(a.files[0], a.files[1], a.ignore_naming, a.max_diffs, a.dequant)
    except (OSError, ValueError) as e:
        print(f"compare_gguf.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
