//! weir's NetworkPolicy model (networking.k8s.io/v1), pure and without I/O.
//!
//! - [`input`]: namespaces, pods, nodes and NetworkPolicies read from Kubernetes objects;
//!   parts of a policy that cannot be understood are left out (allowing less) and reported.
//! - [`identity`]: a numeric identity per distinct (namespace, namespace labels, pod labels,
//!   named ports) set, plus reserved ones (unknown, host, world).
//! - [`compile`]: per pod, isolation per direction and the allowed (peer identity or ipBlock,
//!   protocol, port range) entries, each remembering the policy/rule/peer/port it came from.
//! - [`classes`]: ipBlock prefixes turned into classes for a one-lookup datapath.
//! - [`trace`]: the verdict and the deciding rule for a (source, destination, port).
pub mod cidr;
pub mod classes;
pub mod compile;
pub mod identity;
pub mod incremental;
pub mod input;
pub mod random;
pub mod selector;
pub mod trace;

pub use cidr::Cidr;
pub use classes::CidrClasses;
pub use compile::{Allow, Compiled, Compiler, DirectionPolicy, EndpointPolicy, Origin, PeerMatch};
pub use incremental::{Change, Delta, IncrementalCompiler, ObjectKey};
pub use input::{Cluster, Direction, IpBlock, ObjectRef, PodRef, PolicyRef, Protocol};
pub use trace::{Endpoint, Side, TraceError, Verdict, trace};
