//! Host-side buffers a guest makes through `wasi:http`, charged to its
//! request's memory account before they exist.
//!
//! `wasmtime-wasi-http` keeps header fields and outgoing body channels in
//! host memory, outside the guest's linear memory, so `memory_mb` alone did
//! not bound them: a 16 MiB worker could hold hundreds of MiB in bodies it
//! filled and never sent. The functions that make such buffers are linked
//! here in place of the crate's own, and each charges what it may hold
//! first; over a limit, the guest traps at that call with
//! [`HostMemoryExceeded`], reported as the limit that refused.
//!
//! What is charged stays charged until the instance is dropped, even if the
//! guest drops the resource earlier: a guest can make these buffers in a
//! loop, and only the account's end bounds what a loop can hold.

use cordon_memory::OverBudget;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi_http::FieldMap;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::{self as wit, HostFields};
use wasmtime_wasi_http::p2::body::HostOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostOutgoingRequest, HostOutgoingResponse};

use crate::host::Host;

/// The instance `wasmtime-wasi-http` links its `types` interface as; a
/// component importing any 0.2.x version resolves to it.
const TYPES: &str = "wasi:http/types@0.2.12";

/// What a header entry costs besides its name and value: the map's entry,
/// hash slot and the value's allocation.
const FIELD_ENTRY_BYTES: u64 = 64;

/// The guest's call went over a memory limit while making a host-side
/// buffer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostMemoryExceeded(pub(crate) OverBudget);

fn charge(store: &StoreContextMut<'_, Host>, bytes: u64) -> wasmtime::Result<()> {
    store.data().memory().charge(bytes).map_err(|over| HostMemoryExceeded(over).into())
}

/// A header call's result as the guest sees it: its error converted to the
/// WIT `header-error`, or the trap it stands for.
fn header_result<T>(
    http: &mut wasmtime_wasi_http::WasiHttpCtxView<'_>,
    result: wasmtime_wasi_http::p2::HeaderResult<T>,
) -> wasmtime::Result<Result<T, wit::HeaderError>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) => Ok(Err(wit::Host::convert_header_error(http, e)?)),
    }
}

fn entries_bytes<'a>(entries: impl Iterator<Item = (usize, usize)> + 'a) -> u64 {
    entries.map(|(name, value)| name as u64 + value as u64 + FIELD_ENTRY_BYTES).sum()
}

/// Links the charging versions of the functions that make host buffers,
/// over those `wasmtime-wasi-http` linked.
pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(TYPES)?;

    types.func_wrap(
        "[method]outgoing-request.body",
        |mut store: StoreContextMut<'_, Host>, (request,): (Resource<HostOutgoingRequest>,)| {
            charge(&store, crate::outbound::BODY_BUFFER_BYTES)?;
            let body: Result<Resource<HostOutgoingBody>, ()> = wit::HostOutgoingRequest::body(&mut store.data_mut().http(), request)?;
            Ok((body,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-response.body",
        |mut store: StoreContextMut<'_, Host>, (response,): (Resource<HostOutgoingResponse>,)| {
            charge(&store, crate::outbound::BODY_BUFFER_BYTES)?;
            let body: Result<Resource<HostOutgoingBody>, ()> = wit::HostOutgoingResponse::body(&mut store.data_mut().http(), response)?;
            Ok((body,))
        },
    )?;

    types.func_wrap("[static]fields.from-list", |mut store: StoreContextMut<'_, Host>, (entries,): (Vec<(String, Vec<u8>)>,)| {
        charge(&store, entries_bytes(entries.iter().map(|(n, v)| (n.len(), v.len()))))?;
        let mut http = store.data_mut().http();
        let result = match HostFields::from_list(&mut http, entries) {
            Ok(fields) => Ok(fields),
            Err(e) => Err(wit::Host::convert_header_error(&mut http, e)?),
        };
        Ok((result,))
    })?;
    types.func_wrap(
        "[method]fields.set",
        |mut store: StoreContextMut<'_, Host>, (fields, name, values): (Resource<FieldMap>, String, Vec<Vec<u8>>)| {
            charge(&store, entries_bytes(values.iter().map(|v| (name.len(), v.len()))))?;
            let mut http = store.data_mut().http();
            let result = HostFields::set(&mut http, fields, name, values);
            Ok((header_result(&mut http, result)?,))
        },
    )?;
    types.func_wrap(
        "[method]fields.append",
        |mut store: StoreContextMut<'_, Host>, (fields, name, value): (Resource<FieldMap>, String, Vec<u8>)| {
            charge(&store, entries_bytes(std::iter::once((name.len(), value.len()))))?;
            let mut http = store.data_mut().http();
            let result = HostFields::append(&mut http, fields, name, value);
            Ok((header_result(&mut http, result)?,))
        },
    )?;
    // A clone shares its entries until either side changes, then copies
    // them all: it is charged its full size, as the copy would be.
    types.func_wrap("[method]fields.clone", |mut store: StoreContextMut<'_, Host>, (fields,): (Resource<FieldMap>,)| {
        let bytes = {
            let map: &FieldMap = store.data_mut().http().table.get(&fields)?;
            entries_bytes(map.iter().map(|(n, v)| (n.as_str().len(), v.len())))
        };
        charge(&store, bytes)?;
        Ok((HostFields::clone(&mut store.data_mut().http(), fields)?,))
    })?;

    linker.allow_shadowing(false);
    Ok(())
}
