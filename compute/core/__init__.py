"""The shared core: what every operation uses, each idea in one module.

errors, result, device, progress, validate: the public types and the rules every argument obeys.
polynomials: certified polynomials for exp; monomials: the feature table, builder and weights;
rounding and scaling: the floating-point model's pieces; radius: certified score radii;
cost: the calibrated cost model; planner: what the three planners share; native: building the
optional C kernels. docs/architecture_compute.md has the tree, one line per module.
"""
