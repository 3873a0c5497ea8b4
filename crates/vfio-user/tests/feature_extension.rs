//! The server's DEVICE_FEATURE extension hook (`Server::with_extension`): features the
//! server does not know go to the extension (its data and fds in the reply), known
//! ones never do, a server without one answers ENOTTY, replies larger than the
//! request's argsz are refused, and the extension hears when the owner leaves.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::DeviceError;
use nestio_vfio_user::proto::feature;
use nestio_vfio_user::testdev::TestDevice;
use nestio_vfio_user::{
    Client, ClientConfig, FeatureExtension, FeatureReply, Server, ServerConfig,
};

const MINE: u16 = 0x4e00;

#[derive(Default)]
struct Ext {
    calls: AtomicU32,
    left: AtomicU32,
}

impl FeatureExtension for Ext {
    fn feature(
        &self,
        index: u16,
        flags: u32,
        data: &[u8],
        _room: usize,
    ) -> Option<Result<FeatureReply, i32>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if index != MINE {
            return None;
        }
        Some(match data {
            [] if flags & feature::PROBE != 0 => Ok(FeatureReply::default()),
            [] => {
                let (a, _b) = UnixStream::pair().unwrap();
                Ok(FeatureReply {
                    data: b"answer".to_vec(),
                    fds: vec![OwnedFd::from(a)],
                })
            }
            [0xff] => Ok(FeatureReply {
                data: vec![0; 64],
                fds: Vec::new(),
            }),
            _ => Err(libc::EPERM),
        })
    }
    fn owner_left(&self) {
        self.left.fetch_add(1, Ordering::SeqCst);
    }
}

fn serve(ext: Option<Arc<Ext>>) -> Client {
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut s = Server::new(
            Arc::new(TestDevice::new().unwrap()),
            ServerConfig::default(),
        );
        if let Some(x) = ext {
            s = s.with_extension(x);
        }
        let _ = s.serve_stream(a);
    });
    Client::from_stream(b, ClientConfig::default()).unwrap()
}

fn errno(r: nestio_device_model::Result<(Vec<u8>, Vec<OwnedFd>)>) -> i32 {
    match r {
        Err(DeviceError::Remote { errno, .. }) => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn unknown_features_reach_the_extension_with_fds_in_the_reply() {
    let ext = Arc::new(Ext::default());
    let c = serve(Some(ext.clone()));
    let (d, fds) = c
        .device_feature(MINE, feature::PROBE | feature::GET, &[], 0)
        .unwrap();
    assert!(d.is_empty() && fds.is_empty());
    let (d, fds) = c.device_feature(MINE, feature::GET, &[], 16).unwrap();
    assert_eq!(d, b"answer");
    assert_eq!(fds.len(), 1);
    assert!(fds[0].as_raw_fd() >= 0);
    assert_eq!(
        errno(c.device_feature(MINE, feature::GET, &[1], 16)),
        libc::EPERM
    );
    // 64 bytes of data do not fit the 16 the request left room for.
    assert_eq!(
        errno(c.device_feature(MINE, feature::GET, &[0xff], 16)),
        libc::EINVAL
    );
    // Another unknown feature: the extension declines, the server says ENOTTY.
    assert_eq!(
        errno(c.device_feature(MINE + 1, feature::GET, &[], 16)),
        libc::ENOTTY
    );
    // A feature the server handles itself never reaches the extension.
    let calls = ext.calls.load(Ordering::SeqCst);
    let _ = c.device_feature(feature::MIGRATION, feature::GET, &[], 8);
    assert_eq!(ext.calls.load(Ordering::SeqCst), calls);
    // The owner leaves: the extension hears it once.
    drop(c);
    let t = Instant::now();
    while ext.left.load(Ordering::SeqCst) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "owner_left never called"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ext.left.load(Ordering::SeqCst), 1);
}

#[test]
fn without_an_extension_unknown_features_are_enotty() {
    let c = serve(None);
    assert_eq!(
        errno(c.device_feature(MINE, feature::PROBE | feature::GET, &[], 0)),
        libc::ENOTTY
    );
}
