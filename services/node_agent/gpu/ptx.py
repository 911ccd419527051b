"""The VRAM kernels as PTX text: count the 8-byte words equal or not equal to a value, and fill with a
value, each a grid-stride loop over 16-byte units. `gpu.session` loads them into its context; the scrub,
fill and survey in `gpu.vram` launch them.

Why PTX text and not a compiled module: the node needs only the NVIDIA driver, never the CUDA toolkit, and
the driver JIT-compiles PTX for whatever GPU it finds (Maxwell to Blackwell). The text is generated from
two templates (the two counts differ only in their comparison) so every kernel is exactly what the
interpreter in the tests checks instruction by instruction (tests/framework/fake_gpu.py).
"""

from __future__ import annotations

__all__ = ["KERNELS", "PTX"]

KERNELS = ("qvm_count_ne", "qvm_count_eq", "qvm_fill")
# What every kernel computes after loading its parameters: %rd5 = its first 16-byte unit, %rd6 = the stride.
_GRID_STRIDE = """\tmov.u32 \t%r1, %ctaid.x;
\tmov.u32 \t%r2, %ntid.x;
\tmov.u32 \t%r3, %tid.x;
\tmov.u32 \t%r4, %nctaid.x;
\tcvt.u64.u32 \t%rd5, %r3;
\tmad.wide.u32 \t%rd5, %r1, %r2, %rd5;
\tmul.wide.u32 \t%rd6, %r4, %r2;
"""


def _count_kernel(name: str, cmp: str) -> str:
    """A grid-stride count of the 8-byte words that are `cmp` (ne/eq) to `value`, over `n16` 16-byte units
    (two words each); each thread adds its count to `*result` with one 64-bit atomic. The main loop loads
    four units per thread before comparing (more loads in flight), the tail loop takes the rest."""
    def tally(reg: str) -> str:
        return (f"\tsetp.{cmp}.u64 \t%p2, {reg}, %rd3;\n\tselp.u64 \t%rd30, 1, 0, %p2;\n"
                "\tadd.s64 \t%rd10, %rd10, %rd30;\n")
    main = "".join(tally(f"%rd{r}") for r in range(20, 28))
    tail = tally("%rd20") + tally("%rd21")
    return f""".visible .entry {name}(
\t.param .u64 {name}_buf,
\t.param .u64 {name}_n16,
\t.param .u64 {name}_value,
\t.param .u64 {name}_result
)
{{
\t.reg .pred \t%p<4>;
\t.reg .b32 \t%r<5>;
\t.reg .b64 \t%rd<32>;

\tld.param.u64 \t%rd1, [{name}_buf];
\tld.param.u64 \t%rd2, [{name}_n16];
\tld.param.u64 \t%rd3, [{name}_value];
\tld.param.u64 \t%rd4, [{name}_result];
\tcvta.to.global.u64 \t%rd1, %rd1;
\tcvta.to.global.u64 \t%rd4, %rd4;
{_GRID_STRIDE}\tshl.b64 \t%rd7, %rd6, 4;
\tmul.lo.u64 \t%rd8, %rd6, 3;
\tshl.b64 \t%rd9, %rd6, 2;
\tmov.u64 \t%rd10, 0;
$L_{name}_main:
\tadd.s64 \t%rd11, %rd5, %rd8;
\tsetp.ge.u64 \t%p1, %rd11, %rd2;
\t@%p1 bra \t$L_{name}_tail;
\tshl.b64 \t%rd12, %rd5, 4;
\tadd.s64 \t%rd12, %rd1, %rd12;
\tadd.s64 \t%rd13, %rd12, %rd7;
\tadd.s64 \t%rd14, %rd13, %rd7;
\tadd.s64 \t%rd15, %rd14, %rd7;
\tld.global.v2.u64 \t{{%rd20, %rd21}}, [%rd12];
\tld.global.v2.u64 \t{{%rd22, %rd23}}, [%rd13];
\tld.global.v2.u64 \t{{%rd24, %rd25}}, [%rd14];
\tld.global.v2.u64 \t{{%rd26, %rd27}}, [%rd15];
{main}\tadd.s64 \t%rd5, %rd5, %rd9;
\tbra.uni \t$L_{name}_main;
$L_{name}_tail:
\tsetp.ge.u64 \t%p1, %rd5, %rd2;
\t@%p1 bra \t$L_{name}_done;
\tshl.b64 \t%rd12, %rd5, 4;
\tadd.s64 \t%rd12, %rd1, %rd12;
\tld.global.v2.u64 \t{{%rd20, %rd21}}, [%rd12];
{tail}\tadd.s64 \t%rd5, %rd5, %rd6;
\tbra.uni \t$L_{name}_tail;
$L_{name}_done:
\tsetp.eq.u64 \t%p1, %rd10, 0;
\t@%p1 bra \t$L_{name}_end;
\tatom.global.add.u64 \t%rd31, [%rd4], %rd10;
$L_{name}_end:
\tret;
}}
"""


_FILL_KERNEL = """.visible .entry qvm_fill(
\t.param .u64 qvm_fill_buf,
\t.param .u64 qvm_fill_n16,
\t.param .u64 qvm_fill_value
)
{
\t.reg .pred \t%p<2>;
\t.reg .b32 \t%r<5>;
\t.reg .b64 \t%rd<8>;

\tld.param.u64 \t%rd1, [qvm_fill_buf];
\tld.param.u64 \t%rd2, [qvm_fill_n16];
\tld.param.u64 \t%rd3, [qvm_fill_value];
\tcvta.to.global.u64 \t%rd1, %rd1;
""" + _GRID_STRIDE + """$L_qvm_fill_loop:
\tsetp.ge.u64 \t%p1, %rd5, %rd2;
\t@%p1 bra \t$L_qvm_fill_done;
\tshl.b64 \t%rd7, %rd5, 4;
\tadd.s64 \t%rd7, %rd1, %rd7;
\tst.global.v2.u64 \t[%rd7], {%rd3, %rd3};
\tadd.s64 \t%rd5, %rd5, %rd6;
\tbra.uni \t$L_qvm_fill_loop;
$L_qvm_fill_done:
\tret;
}
"""

# PTX ISA 6.0 for sm_50: every driver since CUDA 9 JIT-compiles it for the GPU at hand (Maxwell to Blackwell).
PTX = ("//\n// qvm VRAM kernels (services/node_agent/gpu/ptx.py): count and fill 8-byte words, grid-stride.\n//\n"
       ".version 6.0\n.target sm_50\n.address_size 64\n\n"
       + _count_kernel("qvm_count_ne", "ne") + "\n" + _count_kernel("qvm_count_eq", "eq") + "\n" + _FILL_KERNEL)
