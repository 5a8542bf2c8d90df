"""Counting what inductor compiles, for the tests that assert graphs per phase."""

from collections import Counter

import torch


def counting_backend(graphs: Counter):
    """Inductor, counting the graphs it compiles into `graphs`: "prefill" for a graph with audio
    among its inputs, "decode" for one without."""
    inductor = torch._dynamo.lookup_backend("inductor")

    def backend(graph_module, example_inputs):
        placeholders = graph_module.graph.find_nodes(op="placeholder")
        has_audio = any("input_features" in node.name for node in placeholders)
        # counted once compiled: inductor may stop a first attempt and dynamo traces again
        compiled = inductor(graph_module, example_inputs)
        graphs["prefill" if has_audio else "decode"] += 1
        return compiled

    return backend
