"""The path network (docs/design.md §5): primitives, the walk, and its two executors."""
