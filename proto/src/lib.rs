//! warden's gRPC API, package `warden.v1`. See `proto/warden/v1/*.proto`
//! for the documentation of every message and field.

#![forbid(unsafe_code)]
#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("warden.v1");
}

pub mod codec;

/// The encoded descriptor set of every warden proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/warden_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn the_descriptor_set_holds_both_services() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<String> = fds
            .file
            .iter()
            .filter(|f| f.package() == "warden.v1")
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        assert_eq!(services, ["Workers", "Profiles", "Events", "Usage"]);
    }

    #[test]
    fn messages_round_trip() {
        let req = super::v1::SpawnRequest {
            user: "alice".into(),
            command: vec!["claude".into(), "-p".into()],
            ..Default::default()
        };
        let back = super::v1::SpawnRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, req);
    }
}
