//! Nested guests: copy to and from a nested guest's memory (seed 000).
