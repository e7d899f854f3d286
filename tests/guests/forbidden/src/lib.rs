//! A component that imports `test:forbidden/secrets`, which the gateway does not provide;
//! the gateway must refuse to load it and name that import.

wit_bindgen::generate!({ world: "forbidden", path: "wit" });

pub struct Forbidden;

impl Guest for Forbidden {
    fn run() -> String {
        test::forbidden::secrets::get("database-password")
    }
}

// Component exports exist only in the WebAssembly build.
#[cfg(target_arch = "wasm32")]
export!(Forbidden);
