"""Scale-out inference over sharded embedding tables (DESIGN.md section 10)."""
