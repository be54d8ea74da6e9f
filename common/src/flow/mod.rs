//! Flow control: which upstream serves a model ([`upstreams`]), and the fleet-wide limiter in
//! Redis that keeps every worker together under each upstream's limits ([`limiter`]).
//! The Lua scripts sit beside this file; docs/architecture.md ("Flow control") has the design.

pub mod budget;
pub mod limiter;
pub mod upstreams;

pub use budget::{Budgets, Charge, Hold, UsageBatch};
pub use limiter::{Admission, Estimate, Limiter, Line, Refusal, Reservation, Settlement};
pub use upstreams::{Limits, Route, Upstream, Upstreams};
