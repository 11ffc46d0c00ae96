//! The application server agent (not built yet).
