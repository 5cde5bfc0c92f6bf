"""Optional report sections, registered with ``sapiens2.bench.run`` (cost model, compile gate, GPU)."""
