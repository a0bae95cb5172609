"""Graph helpers: find linears and block branches, outline a region into a submodule, count FLOPs."""
from .finders import (BlockLayout, BranchRegion, BranchSpec, LinearSite, block_of, find_branch_regions, find_linears,
                      graph_flavour, iter_graph_modules, node_module_path, writes_in_place)
from .flops import node_flops, region_flops
from .outline import outline_region
from .slices import GraphSlice, block_slices, free_after, placeholders, run_slice

__all__ = [
    "BlockLayout", "BranchRegion", "BranchSpec", "LinearSite", "block_of", "find_branch_regions", "find_linears",
    "graph_flavour", "iter_graph_modules", "node_module_path", "node_flops", "region_flops", "outline_region",
    "writes_in_place", "GraphSlice", "block_slices", "free_after", "placeholders", "run_slice",
]
