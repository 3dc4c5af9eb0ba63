//! The operator dashboard on the control plane's HTTP listener: static
//! assets compiled into the binary at `/`, a JSON API under `/api/v1/` that
//! calls the same gRPC services (same roles, same audit), and a
//! server-sent-event stream of [`crate::events::Topic`]s.
